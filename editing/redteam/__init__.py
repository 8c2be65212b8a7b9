"""Red-team audit of an edit: prompt attacks that try to bring an erased concept back
(`prefix` UnlearnDiffAtk-style, `match` P4D-style, `inversion` CCE-style; shared machinery in
`soft`), the revival measurement for pruning masks (`revival`), and the runner that judges them all
the same way (`runner.red_team`). Host-free: the host passes a `hosts.Text` and judges."""
