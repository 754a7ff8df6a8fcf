"""Online RL machinery shared by its objectives (`pandallm.objectives.GRPO`): rollouts generated in the training
step (`rollout`), rewards from code or a reward model (`rewards`), and samples shown to the loggers (`samples`)."""
