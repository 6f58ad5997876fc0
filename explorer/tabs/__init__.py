"""One module per tab of the explorer; each exposes ``build(page, ...)``, called inside its ``gr.Tab``."""
