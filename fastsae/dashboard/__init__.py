"""Feature dashboards: the per-feature data (``fastsae.dashboard.data``) that
``fastsae dashboard`` computes and writes as JSON in SAEDashboard's / Neuronpedia's
export shape. Import the submodule: ``from fastsae.dashboard.data import
write_dashboard_data``."""
