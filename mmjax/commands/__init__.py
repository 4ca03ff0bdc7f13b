"""The `mmjax` subcommands' entry points: train, eval, compile, bench, convert."""
