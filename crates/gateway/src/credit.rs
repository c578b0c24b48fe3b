//! The credit (demand) core: placeholder until written.
