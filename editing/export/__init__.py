"""An edit as files other hosts load: a standard LoRA (`lora`) and diffusers pipelines (`diffusers`)."""

