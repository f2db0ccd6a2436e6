"""pdlaunch launcher: the commands (launcher/commands/) and what they share: hosts, model, plan, job file, the
launch command and its supervision. The contracts with the ranks are in contracts/. Imports no torch."""
__version__ = "0.1.0"  # setup.py reads it
