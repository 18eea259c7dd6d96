"""The offline demo: a scripted stand-in teacher, a reference workload and the whole loop on one machine."""
