//! edgebus integration scenarios, one module per area.
