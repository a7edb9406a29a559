"""The control plane: keeps the fleet, the plan and the prefill-to-decode pairing table."""
