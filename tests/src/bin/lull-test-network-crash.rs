//! `lull-test-network-crash DIR`: the process the network crash test kills. It starts the
//! instance network of a test host whose files live under DIR (in the network namespace it
//! was started in) and attaches instances forever, printing each one's id, until killed.

use lull_netns::network::{AttachRequest, HostNetwork, InstanceNetwork};
use lull_tests::host_net::test_config;

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .expect("usage: lull-test-network-crash DIR");
    let (network, _) = HostNetwork::start(test_config(dir.as_ref())).expect("start the network");
    for i in 0.. {
        let instance = format!("k{i}");
        network
            .attach(&AttachRequest {
                instance: instance.clone(),
                service: "crash".into(),
                allow_peers: true,
                hostname: instance.clone(),
            })
            .expect("attach");
        println!("{instance}");
    }
}
