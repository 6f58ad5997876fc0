"""`python -m age_explorer.explorer`: serve the explorer (see launch.py for the options)."""

from .launch import main

main()
