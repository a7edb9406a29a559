"""The namespace-wide documents kept in the registry beside the workers: each one's name, writer and readers.

These names, with the key layout in `base.py`, are the contract between the runtime and the control
plane; both import them from here.
"""

PLAN_DOCUMENT = "plan"
"""A `Plan` compiled from the deployment spec; written by the control plane, read by `GetPlan`."""
PAIRINGS_DOCUMENT = "pairings"
"""The `PairingTable`; written by the control plane on every fleet change, followed by routers."""
SCALE_DOCUMENT = "scale"
"""The control plane's `ScaleTarget`, present only in an autoscaled deployment; followed by supervisors."""
DEMAND_DOCUMENT = "demand"
"""Where a router calls for capacity (a `CapacityDemand`) when a request finds no decode worker."""
