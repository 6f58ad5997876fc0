"""Start AGE Explorer: `python app.py` serves it on http://127.0.0.1:7860 with the embedded toy model.

The same as `age-explorer-app` or `python -m age_explorer.explorer`; options and environment
variables: `python app.py --help` and docs/deploy.md.
"""

from age_explorer.explorer.launch import main

if __name__ == "__main__":
    main()
