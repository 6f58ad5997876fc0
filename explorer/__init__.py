"""The Gradio explorer. UI code only: every computation goes through ``core``."""
