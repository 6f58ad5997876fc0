"""The concept graph: generation capability G(c), spillover rows Delta(a -> b), and their analyses."""
