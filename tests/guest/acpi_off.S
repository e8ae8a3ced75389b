/* Multiboot guest that powers the machine off the ACPI way: SLP_TYP=5 (the DSDT's _S5) with
 * SLP_EN into PM1a_CNT at port 0x604. kvmpy must end with status 0. */
#include "boot_common.inc"
	MULTIBOOT_HEADER
	.text
	.code32
	.globl _start
_start:
	movl $0x90000, %esp
	movl $msg, %esi
	PUTS
	movw $0x604, %dx
	movw $((5 << 10) | (1 << 13)), %ax
	outw %ax, %dx
	movl $oops, %esi
	PUTS
	DEBUG_EXIT 0x7f
	hlt

	.section .rodata
msg:	.asciz "ACPI S5\n"
oops:	.asciz "still running after S5\n"
