use super::*;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn parse(t: &str) -> Result<Cluster, ConfigError> {
    Cluster::parse(t, Path::new("c.toml"))
}

#[test]
fn tls_section_is_anchored_and_needs_a_file_per_server() {
    let servers = "[[server]]\nid = \"a\"\ndata = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\nadmin = \"127.0.0.1:3\"\n[[server]]\nid = \"b\"\ndata = \"127.0.0.1:4\"\npeer = \"127.0.0.1:5\"\nadmin = \"127.0.0.1:6\"\n";
    let c = Cluster::parse(
        &format!("key = \"{KEY}\"\n{servers}[tls]\nca = \"t/ca.crt\"\ncert = \"t/{{id}}.crt\"\nkey = \"/abs/{{id}}.key\"\n"),
        Path::new("/etc/m/c.toml"),
    )
    .unwrap();
    let t = c.tls.unwrap();
    assert_eq!(t.ca, Path::new("/etc/m/t/ca.crt"));
    assert_eq!(t.cert_for("b"), Path::new("/etc/m/t/b.crt"));
    assert_eq!(t.key_for("a"), Path::new("/abs/a.key"));
    assert!(parse(&format!("key = \"{KEY}\"\n{servers}"))
        .unwrap()
        .tls
        .is_none());
    let e = parse(&format!(
        "key = \"{KEY}\"\n{servers}[tls]\nca = \"ca\"\ncert = \"one.crt\"\nkey = \"one.key\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("{id}"), "{e}");
    let e = parse(&format!("key = \"{KEY}\"\n{servers}[tls]\nca = \"ca\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing field"), "{e}");
}

#[test]
fn fast_path_lists_agent_addresses_in_lazy_clusters_only() {
    let servers = "[[server]]\nid = \"a\"\ndata = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\nadmin = \"127.0.0.1:3\"\n[[server]]\nid = \"b\"\ndata = \"127.0.0.1:4\"\npeer = \"127.0.0.1:5\"\nadmin = \"127.0.0.1:6\"\n";
    let c = parse(&format!(
        "key = \"{KEY}\"\nfast_path = [\"127.0.0.1:7500\", \"[::1]:7500\"]\n{servers}"
    ))
    .unwrap();
    assert_eq!(c.fast_path.len(), 2);
    assert_eq!(c.fast_path[0], "127.0.0.1:7500".parse().unwrap());
    let none = parse(&format!("key = \"{KEY}\"\n{servers}")).unwrap();
    assert!(none.fast_path.is_empty(), "off unless listed");
    let e = parse(&format!(
        "key = \"{KEY}\"\nfast_path = [\"localhost:7500\"]\n{servers}"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("not ip:port"), "{e}");
    let e = parse(&format!(
        "key = \"{KEY}\"\nmode = \"eager\"\nfast_path = [\"127.0.0.1:7500\"]\n{servers}"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("lazy"), "{e}");
}

#[test]
fn parses_a_cluster() {
    let c = parse(&format!(
        "key = \"{KEY}\"\nmode = \"lazy\"\n[[server]]\nid = \"a\"\ndata = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\nadmin = \"127.0.0.1:3\"\n[[server]]\nid = \"b\"\ndata = \"127.0.0.1:4\"\npeer = \"127.0.0.1:5\"\nadmin = \"127.0.0.1:6\"\n"
    ))
    .unwrap();
    assert_eq!(c.servers.len(), 2);
    assert_eq!(
        c.alternates("a"),
        vec![ServerInfo {
            id: "b".into(),
            data: "127.0.0.1:4".into()
        }]
    );
    assert!(c
        .require("zz", "c.toml")
        .unwrap_err()
        .to_string()
        .contains("known: a, b"));
}

#[test]
fn errors_name_the_problem() {
    let e = parse("mode = \"lazy\"\n").unwrap_err().to_string();
    assert!(e.contains("missing `key`"), "{e}");
    let e = parse("key = \"12\"\n").unwrap_err().to_string();
    assert!(e.contains("64 hex"), "{e}");
    let e = parse(&format!("key = \"{KEY}\"\nmode = \"fast\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown mode"), "{e}");
    let e = parse(&format!("key = \"{KEY}\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no [[server]]"), "{e}");
    let servers = "[[server]]\nid = \"a\"\ndata = \"h:1\"\npeer = \"h:2\"\nadmin = \"h:3\"\n[[server]]\nid = \"b\"\ndata = \"h:4\"\npeer = \"h:5\"\nadmin = \"h:6\"\n";
    let e = parse(&format!(
        "key = \"{KEY}\"\nmode = \"eager\"\nreplicas = 2\n{servers}"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("replicas < number of servers"), "{e}");
    let e = parse(&format!("key = \"{KEY}\"\nreplicas = 1\n{servers}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("for mode = \"eager\""), "{e}");
    let c = parse(&format!("key = \"{KEY}\"\nmode = \"eager\"\n{servers}")).unwrap();
    assert_eq!(c.backups("b")[0].id, "a");
    assert_eq!(c.replicas, 1);
    let e = parse("key = [").unwrap_err().to_string();
    assert!(e.starts_with("c.toml:"), "{e}");
}
