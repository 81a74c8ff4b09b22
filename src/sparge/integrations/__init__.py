"""Integrations of sparge into other libraries, imported on demand
(``sparge.integrations.diffusers`` needs diffusers)."""
