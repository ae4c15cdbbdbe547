"""Label workflows, above the training engine: the label audit (``audit.py``), what to label next
(``suggest.py``) and self-supervised adaptation to unlabelled images (``pretrain.py``). They use the engine's
pieces (features, the probe, the audit's scoring) and are used by commands and benchmarks; training itself only
needs the scoring (``engine/audit.py``), which the ``--label-noise`` add-on shares."""
