"""The shipped data (toy model, vocabularies, concept sets, graphs), installed as ``age_explorer.assets``."""
