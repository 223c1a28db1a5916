"""The training application behind ``pddm-ext train`` / ``pddm-ext compare``: the CLI (``cli``),
the training loop (``train``), the loss comparison (``compare``), datasets (``datasets``), models
(``models``) and retrieval evaluation (``evaluate``). Needs the ``train`` extra
(``pip install --no-build-isolation '.[train]'`` from a checkout).
"""
