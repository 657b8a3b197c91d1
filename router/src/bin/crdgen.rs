//! Prints weft's CustomResourceDefinitions (deploy/crds.yaml is this program's output).

fn main() {
    print!("{}", router::meshpeer::crd_yaml());
}
