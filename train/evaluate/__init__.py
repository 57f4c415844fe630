"""Evaluation: the papers' protocols on converted shards, during training and from the command line.

sets.py          which splits are scored, by which protocol (from the manifest), checked up front
protocols.py     embedding a split on every rank and scoring it: top-1, Recall@K / MAP@R, verification
retrieval.py     Recall@K, MAP@R, precision@1 with a chunked kNN (pure functions)
verification.py  insightface's 10-fold face verification (pure functions)
report.py        eval_<set>.json and the printed table rows
standalone.py    a checkpoint or an export loaded for evaluation at any number of ranks
__main__.py      python -m train.evaluate RUN_DIR ...
"""
