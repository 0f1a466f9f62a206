"""Ray Tune layer (sweeps over prunevision trials). Lands with the sweep issue."""
