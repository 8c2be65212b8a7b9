"""The papers' evaluation on any model: prompt sets (`prompts`), judges (`judges`), a resumable
on-disk result cache (`cache`) and the runner that compares an original and an edited model
(`runner`). Pure torch: the host passes generation and the judges' model parts in."""
