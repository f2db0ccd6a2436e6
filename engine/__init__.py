"""pdlaunch engine: the processes of a job (controller, instance leaders and followers), started
one per rank as `python -m engine.main --job RUN_DIR/job.json`. The scheduler and step plans are
pure Python (no torch); the model, KV cache and transfers use torch."""
