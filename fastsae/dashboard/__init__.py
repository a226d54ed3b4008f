"""Feature dashboards (``fastsae dashboard``): per-feature data over a token stream
(``data``), the prompt explorer (``explorer``), the static site (``site``) and its live
server (``server``), over a TransformerLens or Hugging Face model (``model``). Import
the submodules: ``from fastsae.dashboard.data import write_dashboard_data``."""
