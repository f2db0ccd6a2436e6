"""pdlaunch launcher: config -> plan -> launch command. Imports no torch."""
