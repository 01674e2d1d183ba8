// helm: Helm v4's command, built from helm.sh/helm/v4 (pinned in go.mod beside this file), so the
// tests install, upgrade and uninstall Loco's chart against the real control plane with a real Helm.
// A module of its own: Helm's newer grpc and OpenTelemetry must not move the control plane's pins.
package main

import (
	"errors"
	"fmt"
	"os"

	_ "k8s.io/client-go/plugin/pkg/client/auth" // client auth plugins, as upstream's main

	helmcmd "helm.sh/helm/v4/pkg/cmd"
	"helm.sh/helm/v4/pkg/kube"
)

func main() {
	kube.ManagedFieldsManager = "helm" // the field manager stays "helm", as upstream's main sets it
	command, err := helmcmd.NewRootCmd(os.Stdout, os.Args[1:], helmcmd.SetupLogging)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helm:", err)
		os.Exit(1)
	}
	if err := command.Execute(); err != nil {
		if commandErr, ok := errors.AsType[helmcmd.CommandError](err); ok {
			os.Exit(commandErr.ExitCode)
		}
		os.Exit(1)
	}
}
