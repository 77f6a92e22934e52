"""Fine-tuning converted models: :mod:`.finetune`, data sets (:mod:`.data`), checkpoints (:mod:`.checkpoint`) and
the choice of training precision on the machine at hand (:mod:`.precision`)."""
