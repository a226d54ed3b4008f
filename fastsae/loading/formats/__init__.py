"""Publishers' own hub layouts, one module per publisher.

Each module holds :class:`~fastsae.loading.hub.PretrainedSaeHuggingfaceLoader`
functions that read a folder of a repo in that publisher's layout (file names,
config fields, weight names and orientation, normalisation and threshold
conventions) and return a SAELens-style ``(cfg_dict, state_dict, log_sparsity)``;
:mod:`fastsae.loading.hub_loaders` maps the registry's format names to them.
"""
