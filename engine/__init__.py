"""pdlaunch engine: the processes of a job (controller, instance leaders and followers), started
one per rank as `python -m engine.main --job RUN_DIR/job.json`. The controller's side (rank 0: the
control plane, the HTTP server) and the scheduler are pure Python (no torch); the model, KV cache
and transfers of the instance ranks use torch."""
