"""The run layer: one run set up once from a config (setup), trained (train), evaluated
and used for prediction (evaluate)."""
