"""The ``age-explorer`` command, one module per command.

Each command module defines ``HELP`` (its line in ``age-explorer --help``) and ``add_arguments(parser)``,
which adds its flags and sets ``func``, the function that runs it. Command modules import the engine
(torch, diffusers) only inside functions, so that ``age-explorer --help`` stays fast; ``main`` builds
only the chosen command's flags.
"""
