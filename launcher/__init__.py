"""pdlaunch launcher: config -> plan -> launch command. Imports no torch."""
__version__ = "0.1.0"  # setup.py reads it
