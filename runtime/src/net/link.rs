//! Links: the host bridge and the sandboxes' veth pairs, through rtnetlink. (In progress.)
