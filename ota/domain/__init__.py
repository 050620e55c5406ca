"""The rollout domain: pure values and rules, no I/O."""
