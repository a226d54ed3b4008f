"""Parallel training on ``torch.distributed``: data parallelism (:mod:`.data_parallel`,
each rank's share of the data in :mod:`.rank_shards`), the shared collectives
(:mod:`.collectives`) and latent sharding (:mod:`.latent`)."""
