"""SAE evaluation: SAELens 6.x's ``run_evals`` (same config, metric groups, keys and numbers
on the same tokens), and the two summaries the trainer logs during training.

``run_evals(sae, activation_store, model, activation_scaler, eval_config)`` returns
``(eval_metrics, feature_metrics)``:

* ``model_behavior_preservation``: ``kl_div_score``, ``kl_div_with_ablation``,
  ``kl_div_with_sae`` (KL of the spliced / zero-ablated model's next-token distribution
  from the clean one, per token, averaged; score ``(KL_zero - KL_sae) / KL_zero``);
* ``model_performance_preservation``: ``ce_loss_score``, ``ce_loss_with_ablation``,
  ``ce_loss_with_sae``, ``ce_loss_without_sae`` (score
  ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``);
* ``reconstruction_quality``: ``explained_variance`` (``1 - E||x - x_hat||^2 / Var(x)`` over
  all tokens), ``explained_variance_legacy`` (per token against the batch mean, averaged),
  ``mse`` (``||x - x_hat||^2`` summed over dimensions, averaged over tokens), ``cossim``;
* ``shrinkage``: ``l2_norm_in``, ``l2_norm_out``, ``l2_ratio``,
  ``relative_reconstruction_bias`` (``E||x_hat||^2 / E<x, x_hat>`` per batch, averaged);
* ``sparsity``: ``l0``, ``l1`` (of the feature activations, ``!= 0`` and ``|.|``);
* ``token_stats``: ``total_tokens_eval_reconstruction``,
  ``total_tokens_eval_sparsity_variance``;
* feature metrics: ``feature_density``, ``consistent_activation_heuristic`` (active
  tokens / prompts with the feature active), and ``encoder_norm``,
  ``encoder_decoder_cosine_sim``, ``encoder_bias``, each a list of ``d_sae`` floats.

Where fastsae deliberately differs from sae-lens 6.54:

* transcoders are evaluated as transcoders: input read at ``hook_name``, prediction
  (with the skip path) compared with and spliced in at ``metadata.hook_name_out``.
  sae-lens treats them as SAEs at the input hook;
* a score whose denominator is zero is NaN (sae-lens raises ``ZeroDivisionError``);
* the reconstruction/sparsity statistics are computed in at least fp32 and summed over
  batches in fp64 (sae-lens: the model's dtype); CE and KL are averaged exactly as
  sae-lens does, since their scores are differences of close numbers;
* TopK SAEs run through ``encode_sparse``/``decode_sparse`` (no ``[tokens, d_sae]``
  tensor) unless a hook sits on ``hook_sae_acts_pre/post``; the numbers agree with the
  dense path to float rounding;
* ``hook_z`` reshaping is restored even when an eval raises.

Kept as sae-lens has it: ``feature_density`` and ``consistent_activation_heuristic`` are
returned (as NaN lists) whenever any activation metric runs, even with
``compute_featurewise_density_statistics=False``; ``exclude_special_tokens`` is
``run_evals``'s own argument (the store's setting is not used).

From ``activation_store`` only ``get_batch_tokens(n)``, ``store_batch_size_prompts`` and
``context_size`` are read, so fastsae's ``ActivationsStore`` and sae-lens's both work.

The CE/KL batches and then the sparsity/variance batches are taken one after the other
from ``activation_store.get_batch_tokens``, without rewinding in between: sae-lens 6.54
calls ``reset_input_dataset()`` there, but that resets an iterator its token stream does
not read, so its second pass sees the following rows too; we reproduce what it computes.
"""

from fastsae.evals.config import (
    EvalConfig,
    get_eval_everything_config,
    get_git_hash,
    get_library_version,
)
from fastsae.evals.metrics import (
    get_downstream_reconstruction_metrics,
    get_featurewise_weight_based_metrics,
    get_recons_loss,
    get_sparsity_and_variance_metrics,
)
from fastsae.evals.run import language_model_metrics, reconstruction_metrics, run_evals

__all__ = [
    "EvalConfig",
    "get_eval_everything_config",
    "run_evals",
    "get_downstream_reconstruction_metrics",
    "get_sparsity_and_variance_metrics",
    "get_recons_loss",
    "get_featurewise_weight_based_metrics",
    "reconstruction_metrics",
    "language_model_metrics",
    "get_library_version",
    "get_git_hash",
]
