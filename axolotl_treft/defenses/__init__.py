"""The newer defenses, each wired by the plugin through one hook: inoculation prompting (a dataset type),
persona-vector steering (a training callback), perplexity-gap retain selection (a data step before
training) and SafeLoRA (a projection after training)."""
