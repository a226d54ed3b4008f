"""The training data path: token rows from text datasets (:mod:`.text_loading`,
:mod:`.token_rows`), model activations read at a hook (:mod:`.model_hooks`), the
shuffling activation store (:mod:`.activations_store`), activations cached on disk
(:mod:`.activation_cache`, :mod:`.cached_activations_store`) and the offline demo
corpus (:mod:`.docstring_corpus`)."""
