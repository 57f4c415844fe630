"""Facts every layer shares: a leaf package that imports only the standard library.

`model` and `data` never import each other or `train` (docs/design.md, Architecture); what both need lives
here, and nothing here imports a hypermetric package.
"""
