"""Does a produced file still know what training taught: the fidelity gate, its measurements, eval answers."""
