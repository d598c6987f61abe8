package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/pki"
	"github.com/herdhq/herd/lib/rbac"
)

const year = 365 * 24 * time.Hour

func pkiCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pki",
		Short: "The cluster CA: create it, issue certificates whose common name is the etcd user",
		Long: `herd's certificates authenticate every etcd connection: the certificate's common name is the
etcd user, and that user's roles decide what it may read and write (docs/security.md).

A first cluster:
  herd pki init --dir /etc/herd/pki --etcd-host etcd1.example,10.0.0.5
  herd etcd ... --cert-file /etc/herd/pki/etcd-server.crt --key-file /etc/herd/pki/etcd-server.key \
    --trusted-ca-file /etc/herd/pki/ca.crt            # or your own etcd with the same files
  herd rbac apply --endpoints https://10.0.0.5:2379 --cacert /etc/herd/pki/ca.crt \
    --cert /etc/herd/pki/root.crt --key /etc/herd/pki/root.key
  herd pki issue --dir /etc/herd/pki --role coordinator coord-a --host 10.0.0.7 (with root's flags)`,
		Example: `  herd pki init --dir /etc/herd/pki --etcd-host 10.0.0.5
  herd pki issue --dir /etc/herd/pki --role viewer dashboard --no-user`,
	}
	cmd.AddCommand(pkiInitCmd(), pkiIssueCmd(), pkiMigrationCmd())
	return cmd
}

func pkiMigrationCmd() *cobra.Command {
	var (
		dir, out string
		hosts    []string
		validity time.Duration
	)
	cmd := &cobra.Command{
		Use:   "migration",
		Short: "Write a node's live-migration TLS certificate in QEMU's layout (for nodes that do not join)",
		Long: `Live migration over TLS (herd agent --migrate-tls) needs, on every node, qemu.conf's
migrate_tls_x509_cert_dir holding ca-cert.pem, server-cert.pem/-key.pem and client-cert.pem/-key.pem
from one CA, the server certificate naming the node's migration address. Netbooted nodes that join
with --migrate-tls get them from the join; this command makes them for any other node.`,
		Example: `  herd pki migration --dir /etc/herd/pki --host 10.0.0.17 --out /etc/pki/qemu
  echo 'migrate_tls_x509_cert_dir = "/etc/pki/qemu"' >> /etc/libvirt/qemu.conf`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if len(hosts) == 0 {
				return fmt.Errorf("--host: the node's migration address is required (QEMU checks it)")
			}
			ca, err := pki.LoadCA(dir)
			if err != nil {
				return err
			}
			crt, key, err := ca.Issue("herd-migration:"+hosts[0], pki.RoleMigration, hosts, validity)
			if err != nil {
				return err
			}
			if err := pki.WriteQEMUDir(out, ca.CertPEM, crt, key); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "migration certificate for %s in %s\n", strings.Join(hosts, ", "), out)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "the CA's directory")
	f.StringSliceVar(&hosts, "host", nil, "the node's migration address(es)")
	f.StringVar(&out, "out", "/etc/pki/qemu", "directory to write (qemu.conf's migrate_tls_x509_cert_dir)")
	f.DurationVar(&validity, "validity", year, "certificate lifetime")
	_ = cmd.MarkFlagRequired("dir")
	return cmd
}

func pkiInitCmd() *cobra.Command {
	var (
		dir, name string
		hosts     []string
		validity  time.Duration
	)
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create the cluster CA, the etcd server certificate and root's client certificate",
		Example: `  herd pki init --dir /etc/herd/pki --etcd-host etcd1.example,10.0.0.5,127.0.0.1
  # refuses to overwrite an existing CA; see docs/security.md to rotate it`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ca, err := pki.InitCA(dir, name, validity)
			if err != nil {
				return err
			}
			if _, _, err := ca.IssueFiles(dir, "etcd-server", "etcd-server", pki.RoleEtcd, hosts, validity); err != nil {
				return err
			}
			if _, _, err := ca.IssueFiles(dir, "root", rbac.Root, pki.RoleRoot, nil, validity); err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "CA %s in %s\nfingerprint %s (nodes pin it: herd.ca= on the kernel command line)\n", name, dir, pki.Fingerprint(ca.Cert))
			fmt.Fprintf(out, "etcd server certificate for %s: %s\n", strings.Join(hosts, ", "), filepath.Join(dir, "etcd-server.crt"))
			fmt.Fprintf(out, "root client certificate: %s (keep it offline after set-up)\n", filepath.Join(dir, "root.crt"))
			fmt.Fprintf(out, "next: start etcd with TLS, then `herd rbac apply` with root's certificate\n")
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "directory for the CA (created, mode 0700)")
	f.StringVar(&name, "name", "herd cluster CA", "the CA's common name")
	f.StringSliceVar(&hosts, "etcd-host", []string{"127.0.0.1", "localhost"}, "names and addresses clients reach etcd at")
	f.DurationVar(&validity, "validity", 10*year, "lifetime of the CA and of the etcd and root certificates")
	_ = cmd.MarkFlagRequired("dir")
	return cmd
}

func pkiIssueCmd() *cobra.Command {
	var (
		eo              etcdutil.Options
		dir, role, outD string
		hosts           []string
		validity        time.Duration
		noUser          bool
	)
	cmd := &cobra.Command{
		Use:   "issue NAME",
		Short: "Issue a certificate for an etcd user NAME with a herd role, and create the user",
		Long: `Writes NAME.crt and NAME.key, signed by the CA in --dir, whose common name NAME is the etcd user.
With root's certificate (--cacert/--cert/--key or HERD_*), it also creates the etcd user with the
role's etcd roles; without, it prints the etcdctl commands that do.

Roles: coordinator (all of herd's keys, and user administration for node joins), bootserver,
operator (specs, hardware, images, rollout; read all), viewer (read all), root.
Only coordinator and bootserver certificates serve TLS (--host names their addresses); the others
are client-only. Nodes get no certificate from here: they join with a one-time token
(docs/security.md).`,
		Example: `  herd pki issue --dir /etc/herd/pki --role coordinator coord-a --host 10.0.0.7,coord-a.example
  herd pki issue --dir /etc/herd/pki --role operator alice --validity 720h \
    --endpoints https://10.0.0.5:2379 --cacert /etc/herd/pki/ca.crt \
    --cert /etc/herd/pki/root.crt --key /etc/herd/pki/root.key`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if strings.HasPrefix(name, rbac.NodeUser("")) {
				return fmt.Errorf("%s: node users are made when a node joins, not issued by hand", name)
			}
			if strings.ContainsAny(name, "/ \t") {
				return fmt.Errorf("%q: a user name cannot contain '/' or spaces", name)
			}
			roles, err := rbac.RolesFor(role)
			if err != nil {
				return err
			}
			ca, err := pki.LoadCA(dir)
			if err != nil {
				return err
			}
			if outD == "" {
				outD = dir
			}
			crt, _, err := ca.IssueFiles(outD, name, name, pki.Role(role), hosts, validity)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "issued %s (user %s, role %s, until %s)\n", crt, name, role, time.Now().Add(validity).Format("2006-01-02"))
			if noUser || role == "root" {
				return nil
			}
			if len(eo.Endpoints) == 0 || eo.Cert == "" {
				fmt.Fprintf(out, "create the etcd user as root:\n  etcdctl user add %s --no-password\n", name)
				for _, r := range roles {
					fmt.Fprintf(out, "  etcdctl user grant-role %s %s\n", name, r)
				}
				return nil
			}
			c, err := etcdutil.New(eo)
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			if err := rbac.EnsureUser(ctx, c, name, roles...); err != nil {
				return fmt.Errorf("create etcd user %s (run as root): %w", name, err)
			}
			fmt.Fprintf(out, "etcd user %s has roles %s\n", name, strings.Join(roles, ", "))
			return nil
		},
	}
	eo.AddFlags(cmd.Flags())
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "the CA's directory")
	f.StringVar(&role, "role", "", "coordinator, bootserver, operator, viewer or root")
	f.StringVar(&outD, "out", "", "where to write NAME.crt and NAME.key (default --dir)")
	f.StringSliceVar(&hosts, "host", nil, "names and addresses the holder serves at (a coordinator's join endpoint)")
	f.DurationVar(&validity, "validity", year, "certificate lifetime")
	f.BoolVar(&noUser, "no-user", false, "only write the files; do not create the etcd user")
	_ = cmd.MarkFlagRequired("dir")
	_ = cmd.MarkFlagRequired("role")
	return cmd
}

func rbacCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rbac",
		Short: "herd's etcd roles: apply them and turn authentication on, or print them as etcdctl commands",
		Example: `  herd rbac apply --endpoints https://10.0.0.5:2379 --cacert ca.crt --cert root.crt --key root.key
  herd rbac script > herd-roles.sh`,
	}
	var eo etcdutil.Options
	apply := &cobra.Command{
		Use:   "apply",
		Short: "Create herd's etcd roles and the root user, and enable authentication (idempotent)",
		Example: `  herd rbac apply --endpoints https://10.0.0.5:2379 --cacert /etc/herd/pki/ca.crt \
    --cert /etc/herd/pki/root.crt --key /etc/herd/pki/root.key`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if eo.Cert == "" || eo.User() != rbac.Root {
				return fmt.Errorf("run as root: --cert must be root's certificate (herd pki init wrote root.crt), got user %q", eo.User())
			}
			space, err := eo.Space()
			if err != nil {
				return err
			}
			c, err := etcdutil.New(eo)
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), 60*time.Second)
			defer cancel()
			if err := rbac.Apply(ctx, c, space); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "roles applied and authentication enabled; issue certificates with `herd pki issue`")
			return nil
		},
	}
	eo.AddFlags(apply.Flags())
	var prefix string
	script := &cobra.Command{
		Use:     "script",
		Short:   "Print herd's roles as an etcdctl script (for etcd clusters set up by hand)",
		Example: "  herd rbac script --prefix /herd > herd-roles.sh",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o := etcdutil.Options{Prefix: prefix}
			space, err := o.Space()
			if err != nil {
				return err
			}
			_, err = fmt.Fprint(cmd.OutOrStdout(), rbac.Script(space))
			return err
		},
	}
	script.Flags().StringVar(&prefix, "prefix", envOr("HERD_PREFIX", "/herd"), "root of herd's keys")
	cmd.AddCommand(apply, script)
	return cmd
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
