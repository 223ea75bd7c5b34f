"""Wire front ends. Each translates its protocol to DataPlane calls and back, nothing more."""
