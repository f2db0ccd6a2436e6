"""One module per `pdlaunch` command; launcher/cli.py parses the arguments and imports the chosen one."""
