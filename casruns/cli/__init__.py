"""The command line. Deliberately empty: ``casruns.cli.fast`` must import without click."""
