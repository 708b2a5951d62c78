"""Demos and their inputs, beside the core: the ``omnicompile demo`` run (`demo`), the training demo
(`train_demo`), models to run on (`models`), attention inputs with known structure (`structured`)
and selection heatmaps (`plotting`). The core never imports this package; the CLI does."""
