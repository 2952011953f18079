"""The Optuna study of a hyperparameter search: where it is stored, its search space,
its trials' bookkeeping (owners, interrupted trials continued, the budget) and the
per-epoch feed a trial's training reports to (pruning)."""
