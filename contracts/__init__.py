"""The contracts between the launcher and the ranks, owned by neither side: the job config and its
checks, the plan, the job file, the request lines and their sampling parameters, the typed messages
ranks exchange, the hostfile format, the model's shape and tensor layout, the rule by which a step
takes prompt tokens (engine and simulator run the same one), and the one error users see.
No torch; imports nothing from `launcher` or `engine`."""
