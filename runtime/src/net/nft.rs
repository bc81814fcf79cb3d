//! The firewall: one nftables table owned by sandboxd, driven in-process through libnftables. (In progress.)
