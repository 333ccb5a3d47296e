//! A session: decoded image + NBD server + appliance VM + agent connection.
