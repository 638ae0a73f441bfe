"""One module per tab: each lays out its components and wires events to handlers defined at module level."""
