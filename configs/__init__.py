"""gin configs. A package so that gin finds `include 'configs/...'` from any working directory
(gin resolves an include it cannot open as a file as a package resource)."""
